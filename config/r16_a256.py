# LoRA r=16, alpha=256: a larger scaling at the same rank (handout 5.8)
lora_rank = 16
lora_alpha = 256.0
out_dir = "runs/r16_a256"
