"""``python -m gptkit`` (what ``accelerate launch -m gptkit`` and ``torchrun -m gptkit`` run)."""

from gptkit.cli import main

main()
