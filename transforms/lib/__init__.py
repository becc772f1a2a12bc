"""Pure stage libraries: no Beam, nothing from transforms/ above this package, model/ or pipelines/."""
