"""The records every stage shares, each read once into a typed object and checked on the way in.

``tiling_record`` (how tiles were cut), ``features_folder`` (features h5 files with their backbone
card and tiling), ``checkpoint`` (a trained head, and its backbone for end-to-end runs) and
``package`` (the exported model the engine reads). Each carries its schema version and says what to
do when a file is missing, malformed or tampered with. The contracts are written down in
docs/formats.md.
"""
