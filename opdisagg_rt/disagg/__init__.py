"""Operation-level disaggregation: any operation on any stage, as a stage spec says.

spec.py (load/validate specs) -> graph.py (visits, boundary tensors) -> executor.py (DisaggRunner,
the ModelRunner interface over stage workers) -> worker.py (a stage process) over transport/
(shm ring, torch.distributed, CUDA IPC). meta.py: step metadata on the wire, micro-batch split,
decode-first order; weights.py: building only some operations; latency.py: transport latency.
"""
