# Full fine-tuning, no LoRA, dropout 0.05 (handout 5.4 and 5.8)
lora_rank = 0
dropout = 0.05
out_dir = "runs/full"
