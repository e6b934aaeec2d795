"""A reward any policy can learn, to check the GRPO loop itself: 1 when the reply starts with 正面, else 0.

Used as ``zhtune grpo --reward python --reward_fn bench/grpo_always_positive.py:pos`` after the SFT of
bench/grpo_cpu.py (see bench/results/README.md): if generation, reward and update are wired right, the
policy learns to answer 正面 whatever the review, and the training reward climbs to 1 within a few steps.
"""


def pos(completions, references, **cols):
    return [1.0 if c.strip().startswith("正面") else 0.0 for c in completions]
