"""Running Lexica on Ray clusters: the pipeline entrypoint of a Ray job and the job submitter."""
