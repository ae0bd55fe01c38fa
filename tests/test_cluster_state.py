"""``study --status`` bookkeeping that needs no Slurm: array-id ranges, records, and a clear line without squeue."""

from __future__ import annotations

import json

from napari_clip_ad.cli import main
from napari_clip_ad.cluster.state import _expand, add_submission, cell_states, read_jobs, record_sbatch_array


def test_sacct_array_ranges_expand_to_tasks():
    assert _expand("123_[0-2,5%2]") == ["123_0", "123_1", "123_2", "123_5"]
    assert _expand("123_4") == ["123_4"] and _expand("77") == ["77"]


def test_sbatch_array_recorded_once_report_added_later(tmp_path):
    scripts, out = tmp_path / "jobs", tmp_path / "study"
    scripts.mkdir()
    (scripts / "cells.txt").write_text("intensity-baseline\nvand-industrial\n")
    assert record_sbatch_array(out, scripts, "41")  # a cell task records the array first
    assert not record_sbatch_array(out, scripts, "41", report="42")  # submit.sh then only adds the report job
    [record] = read_jobs(out)["submissions"]
    assert record["report"] == "42" and record["cells"]["vand-industrial"] == {"job": "41_1", "log": str(scripts / "logs" / "cell_41_1.out")}


def test_status_without_squeue_is_one_line_but_finished_cells_need_no_slurm(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    add_submission(out, {"array": "5", "report": "6", "folder": "x", "cells": {"a": {"job": "5_0", "log": "l0"},
                                                                            "b": {"job": "5_1", "log": "l1"}}})
    (out / "cells" / "a").mkdir(parents=True)
    (out / "cells" / "a" / "done.json").write_text("{}")
    monkeypatch.setenv("PATH", str(tmp_path))  # like a laptop holding a synced copy of the folder: no Slurm commands
    assert cell_states(out, ["a"]) == {"a": ("finished", "l0", "")}
    (out / "study.json").write_text(json.dumps({"cells": ["a", "b"]}))
    assert main(["study", "--status", str(out)]) == 2
    assert "no 'squeue' on PATH" in capsys.readouterr().err
