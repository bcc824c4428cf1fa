"""The Gradio chat page in front of Serve."""
