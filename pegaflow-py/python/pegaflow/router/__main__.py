from pegaflow.router.app import main

main()
