"""File processing services: storage, sniffing, checksums, images, archives, CSV, compression."""
