# LoRA r=196, alpha=784 (handout 5.4)
lora_rank = 196
lora_alpha = 784.0
out_dir = "runs/r196_a784"
