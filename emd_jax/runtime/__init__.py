"""The run machinery shared by every job: loop, checkpoints, preemption, fault injection, logs, meshes."""
