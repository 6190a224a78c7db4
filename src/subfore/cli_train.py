"""Training commands (pretrain, finetune, evaluate, predict, study) — registered on the shared app."""
