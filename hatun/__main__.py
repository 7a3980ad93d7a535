from hatun.cli import main

raise SystemExit(main())
