"""Planning a conversion: which tensors form each W4A8 module, what each output shard holds, and
``inspect``, which reports the plan without running it."""
