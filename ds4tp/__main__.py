from ds4tp.cli import main

raise SystemExit(main())
