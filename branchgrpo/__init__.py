"""BranchGRPO: tree-structured GRPO fine-tuning of flow-matching models (plain torch, no ComfyUI)."""
from .advantage import AdvantageConfig, compute_advantages
from .loss import OptimConfig, policy_update, ppo_clip_loss
from .presets import PRESETS, preset
from .pruning import PruningConfig, select_edges
from .schedule import BranchSchedule, parse_steps
from .trainer import BranchGRPOTrainer, Callback, TrainerConfig
from .tree import Tree, rollout

__version__ = "0.1.0"

__all__ = [
    "AdvantageConfig", "BranchGRPOTrainer", "BranchSchedule", "Callback", "OptimConfig", "PRESETS",
    "PruningConfig", "Tree", "TrainerConfig", "compute_advantages", "parse_steps", "policy_update",
    "ppo_clip_loss", "preset", "rollout", "select_edges",
]
