# LoRA r=16, alpha=64 (handout 5.4 and 5.8)
lora_rank = 16
lora_alpha = 64.0
out_dir = "runs/r16_a64"
