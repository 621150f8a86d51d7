"""Continuous batching, sampling and detokenization: no Triton, no torch.

- `scheduler`: the decode loop (admission, decode steps, accounting); `Scheduler`.
- `courier`: the thread that sends the outputs and polls cancellation; `Courier`.
- `sequence`: a request (`Sequence`), a response (`Output`), the counters (`Stats`), `QueueFull`.
- `sampling`: sampling parameters, the host sampler, the end-id ban of greedy steps.
- `detokenize`: streaming text release and stop strings (`TextTracker`, `delta`).
"""
