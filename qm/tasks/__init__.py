"""Built-in task types shipped with QueueMaster."""
