"""The constants of the counter-based hash that seeded sampling draws its noise from, shared by the
PyTorch sampler (sampler.py, the oracle) and the fused Triton kernel (triton_sampler.py): the same
bits on both paths, so a token never depends on which path sampled it. A module of its own so that
neither sampler imports the other."""

# Multipliers of the "lowbias32" integer finaliser (from Chris Wellons' hash-prospector search), a
# 32-bit bijection with lower avalanche bias than murmur3's fmix32.
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
# Distinct salts so that seed words, counter words and vocab indices enter the hash differently.
SALT_SEED = 0x243F6A88
SALT_COUNTER = 0xB7E15162
SALT_VOCAB = 0x9E3779B9
