"""Infrastructure: one description of what runs on the VM (spec), pure renderers, and Pulumi components."""
