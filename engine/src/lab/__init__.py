"""The lab: training, distillation, metrics, quality studies, peers and the kernel self-check.

It imports the runtime (``edmrt``); the runtime never imports the lab.  scipy, scikit-learn, matplotlib and
the peers (k-diffusion, diffusers) are imported where they are used.
"""
