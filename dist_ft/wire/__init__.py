"""What crosses the wire between driver, rollout workers and learners, in torch alone (no
``datasets``, no model code; a test checks it): a ``Prompt`` out to a worker, a ``ScoredBatch``
back (token ids, ``Span`` masks, logprobs, rewards, advantages, policy version), and the packing
of its episodes into rows for the learner."""
