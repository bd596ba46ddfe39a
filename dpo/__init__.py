"""The DPO training pipeline's library: config, data, layouts, models, reference, log-probs, losses, the training
loop (`python -m dpo.train`) and its outputs. Data preparation is the sibling package `data_prep`."""
