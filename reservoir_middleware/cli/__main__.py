from reservoir_middleware.cli.main import main

raise SystemExit(main())
