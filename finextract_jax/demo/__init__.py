"""The embedded demo: the committed testbed base (finextract_jax/testbed/base_model) fine-tuned on
Twemoji's nine cat faces it never saw, extracted with FineXtract and both baselines, and reported."""
