"""ACE-Step v1-3.5B as importable components, for serving on Triton.

Importing the package itself pulls in no torch, so the gateway can read
`acestep_triton.contract`.
"""
