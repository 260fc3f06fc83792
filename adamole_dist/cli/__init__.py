"""The command-line entry points, the top floor: one module per command, each with a ``main(argv=None) -> int``.

Installed as console scripts (adamole-train, adamole-eval, adamole-generate, adamole-export, adamole-plot),
runnable as ``python -m adamole_dist.cli.<command>``, and wrapped by launch/<command>.py for the launchers
(``deepspeed launch/train.py ...``)."""
