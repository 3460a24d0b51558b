"""The GPU fast path: each piece proven equal to the plain path, each can be turned off.

* [`plan`][loraforge.fast.plan]: the planner, a pure function of the model's shape, the recipe
  and a memory budget;
* [`activations`][loraforge.fast.activations]: what a decoder layer keeps for its backward
  pass, counted from the model's shape (the planner's memory model);
* [`attention`][loraforge.fast.attention]: variable-length flash attention for packed rows;
* [`packing`][loraforge.fast.packing]: padding-free rows of whole examples;
* [`losses`][loraforge.fast.losses]: the packed loss and the chunked ``lm_head`` cross-entropy;
* [`lora_ops`][loraforge.fast.lora_ops]: memory-lean LoRA functions and norms, and where they
  apply;
* [`kernels`][loraforge.fast.kernels]: Triton kernels and their torch fallbacks.
"""
