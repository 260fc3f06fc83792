"""Evaluation of a trained adapter outside training, below the eval command: multiple-choice accuracy with
the routing it took (choice_accuracy.py) and lm-evaluation-harness on the adapted model, with the local
task YAMLs shipped as package data (harness.py, harness_tasks/). The trainer's own held-out evaluation is
train/held_out.py; the sharded scoring both use is data/evaluate.py."""
