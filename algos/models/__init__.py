"""Models: loading a policy (`policy`), the offline tiny model (`tiny`), supervised fine-tuning
(`sft`) and the cached warm start of the tiny model (`warm_start`)."""
