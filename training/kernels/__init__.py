"""Optional faster paths for library models, each applied by one function and each proven equal to the plain path."""
