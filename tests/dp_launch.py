"""`python dp_launch.py STOP ARGS...`, alone or under torchrun: the command line `ARGS` (as
`python -m hybrid_lora ARGS`), interrupted on training forward pass STOP of each process
(0: never), as a killed job would be. Used by test_distributed.py."""
import sys

import hybrid_lora.train as train_mod
from hybrid_lora.cli import main


class Interrupt(Exception):
    pass


if __name__ == "__main__":
    stop, calls, real = int(sys.argv[1]), [0], train_mod.causal_lm_sums

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop:
            raise Interrupt(f"interrupted at training forward pass {stop}")
        return real(*args, **kwargs)

    train_mod.causal_lm_sums = counted
    sys.exit(main(sys.argv[2:]))
