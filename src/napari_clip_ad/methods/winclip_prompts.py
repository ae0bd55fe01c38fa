"""WinCLIP's compositional prompt ensemble, as anomalib defines it (``winclip/prompting.py``).

Every state phrase (with the object name) is put into every template; the ensemble of one side is
``[template.format(state) for state in states for template in TEMPLATES]`` (state-major order).
"""

from __future__ import annotations

from .prompt_sets import PromptSet

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# anomalib lists "a jpeg corrupted photo of the {}." twice (and no "... of a {}." variant): kept as is,
# since the duplicate weighs that template twice in the per-side mean.
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def compositional_prompts(object_name: str, prompt_set: PromptSet | None = None) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompt lists for an object (7 x 21 = 147 and 4 x 21 = 84 prompts).

    Args:
        object_name: The object the prompts name (e.g. "brain").
        prompt_set: Other states/templates (same order); None for anomalib's lists.

    Returns:
        (normal prompts, anomalous prompts), state-major like anomalib's ``create_prompt_ensemble``.
    """
    normal_states, anomalous_states, templates = (NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES) if prompt_set is None else (
        prompt_set.normal_states, prompt_set.abnormal_states, prompt_set.templates)
    normal = [template.format(state.format(object_name)) for state in normal_states for template in templates]
    anomalous = [template.format(state.format(object_name)) for state in anomalous_states for template in templates]
    return normal, anomalous
