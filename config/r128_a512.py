# LoRA r=128, alpha=512: the default run (handout 5.4)
lora_rank = 128
lora_alpha = 512.0
out_dir = "runs/r128_a512"
