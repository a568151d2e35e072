"""What the tests share and are not tests themselves; bench/ may import it, tests never import bench/."""
