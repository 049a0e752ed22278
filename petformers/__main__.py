from petformers.cli.main import main

raise SystemExit(main())
