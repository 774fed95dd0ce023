"""Decoding, in layers that import only downwards (each module imports only those below it):

    calibrate   choose the chain length and draft tree from measured acceptance and forward costs
    reach       how often each node of a draft tree is reached under sampling (for calibrate)
    generate    the driver: `generate()`, its results and statistics, plain decoding
    conditioned chains and trees of token-conditioned draft heads (each draft reads its parent)
    speculate   one speculation step: verify the drafts and propose the next ones, in one forward
    tree        draft trees (a chain of k drafts is `Tree.chain(k)`): paths, parents, masks
    engine      the decode forward, with the weights in a layout made for small steps
    sampling    logits processing, sampling, and the exact acceptance rules

Command-line code (argument parsing, streaming text to a terminal) lives in
`multitoken.commands`. This package module imports nothing, so importing one layer never
imports the layers above it. The public entry point is also `multitoken.generate`.
"""
