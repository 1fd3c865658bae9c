from app.demo.cli import main

raise SystemExit(main())
