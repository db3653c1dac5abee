"""Tensor-parallel worker groups: the torch.distributed group and the model's split
(tensor_parallel.py), and the engine link relayed from rank 0 to the other ranks (group_link.py).
"""
