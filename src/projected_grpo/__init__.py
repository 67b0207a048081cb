"""projected_grpo: GRPO on loophole-graded coding problems, with the hack-ward gradient
erased, routed into a deletable quarantine knob, or only measured. docs/design.md draws the
modules; the other pages of docs/ explain each part."""

__version__ = "0.2.0"
