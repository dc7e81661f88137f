"""Fault injection for the multi-process tests: process 1 dies outright (no handler runs) when the processes
compare notes after step 2, as a process killed by the system would."""

import os

import qlora_kit.train.loop as loop


def die_after_step_2() -> None:
    compare, steps = loop.signal_of_any_process, []

    def dies_after_step_2(accelerator, received):
        steps.append(1)
        if accelerator.process_index == 1 and len(steps) == 2:
            os._exit(3)
        return compare(accelerator, received)

    loop.signal_of_any_process = dies_after_step_2
