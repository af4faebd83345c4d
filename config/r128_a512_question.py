# The default run with the alternative prompt template (handout 5.11-5.12)
lora_rank = 128
lora_alpha = 512.0
prompt_template = "question"
out_dir = "runs/r128_a512_question"
