"""Tools that use what runs leave: the homework's tables (report), exports (export), speed (bench)."""
