"""Socket types of the pack. Native types (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE) stay native;
these carry only objects ComfyUI has no type for. ``LORA_MODEL`` is ComfyUI's own (native trainer)."""
from comfy_api.latest import io

Schedule = io.Custom("BRANCHGRPO_SCHEDULE")
Advantage = io.Custom("BRANCHGRPO_ADVANTAGE")
Pruning = io.Custom("BRANCHGRPO_PRUNING")
TrainerSettings = io.Custom("BRANCHGRPO_TRAINER_SETTINGS")
Prompts = io.Custom("BRANCHGRPO_PROMPTS")
RewardModel = io.Custom("REWARD_MODEL")
Tree = io.Custom("BRANCHGRPO_TREE")
Metrics = io.Custom("BRANCHGRPO_METRICS")
LoraModel = io.Custom("LORA_MODEL")

CATEGORY = "BranchGRPO"
