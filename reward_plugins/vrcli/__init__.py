"""VR-CLI (Gurung & Lapata, 2025): reward = percent improvement in a gold continuation's perplexity from a plan.

`prompts` builds the scored input, `plan` extracts the plan, `scoring` holds the improvement and shaping
maths, `baselines` the no-plan perplexity and its fingerprint, `plugin` the configured `vrcli` reward.
"""

from .baselines import (
    FINGERPRINT_KEY,
    BaselineMismatchError,
    baseline_inputs,
    baseline_perplexities,
    fingerprint,
    fingerprint_differences,
    model_id,
    valid_baseline,
)
from .plan import PAPER_MARKERS, extract_plan, find_plan, strip_special_tokens
from .plugin import (
    FingerprintPolicy,
    PlanConfig,
    ScorerConfig,
    ShapingConfig,
    VRCLIConfig,
    VRCLIPlugin,
    has_vrcli,
)
from .prompts import APPEND_TEMPLATES, LAYOUTS, PAPER_TEMPLATES, PLAN_HEADING, ScoredInput, VRCLIPrompt
from .scoring import EVAL_METRICS, Scheme, eval_metrics, improvement, shape

__all__ = [
    "APPEND_TEMPLATES", "EVAL_METRICS", "FINGERPRINT_KEY", "LAYOUTS", "PAPER_MARKERS", "PAPER_TEMPLATES",
    "PLAN_HEADING", "BaselineMismatchError", "FingerprintPolicy", "PlanConfig", "ScoredInput", "ScorerConfig",
    "Scheme", "ShapingConfig", "VRCLIConfig", "VRCLIPlugin", "VRCLIPrompt", "baseline_inputs",
    "baseline_perplexities", "eval_metrics", "extract_plan", "fingerprint", "fingerprint_differences",
    "find_plan", "has_vrcli", "improvement", "model_id", "shape", "strip_special_tokens", "valid_baseline",
]
