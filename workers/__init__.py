"""Background workers: embedding images and keeping the vector store in step with Label Studio."""
