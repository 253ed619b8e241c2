"""Source for scripts run in a fresh interpreter: how often a freed 64 MB block is page-faulted in again.

``FAULTING_CYCLES`` defines ``faulting_cycles()``: 20 times, allocate and free a 64 MB
tensor and count the cycles whose minor page faults cover more than half of its pages
(a block glibc mapped afresh). A script appends its own setup and prints what it measured.
"""

FAULTING_CYCLES = """
import resource, torch

def faulting_cycles():
    faulting = 0
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()  # 64 MB
        faulting += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > (64 << 20) // 4096 // 2
    return faulting
"""
