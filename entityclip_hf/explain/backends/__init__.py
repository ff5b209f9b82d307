"""Generator backends: each turns texts into `ExplanationResult`s; everything else is shared (see ``run``)."""
