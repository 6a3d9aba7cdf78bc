"""The beamops operator catalog: one module per operator (kernel, parameters, spec)."""
