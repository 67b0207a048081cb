"""projected_grpo: GRPO on loophole-graded coding problems, with the hack-ward gradient
erased, routed into a deletable quarantine knob, or only measured. See docs/ and DESIGN."""

__version__ = "0.2.0"
