"""Running a plan: checking values, processing modules on the CPU, an NPU or a GPU, writing shards,
and the jobs around it (resume, job arrays, finalize)."""
